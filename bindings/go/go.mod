module lora

go 1.19
