module lora-example

go 1.19

require lora v0.0.0

// The binding lives in this repository; an application outside it points
// the replace directive at its checkout of bindings/go.
replace lora => ../../bindings/go
