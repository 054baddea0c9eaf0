# liblora: the README's two commands.
#   make demo   build liblora (release) and run the main demo on the CPU
#   make test   run every test (Rust, C under sanitizers, fixtures)
CARGO ?= cargo
CC ?= cc
BUILD := build
LIBDIR := target/release

.PHONY: all lib demo test clean

all: lib

lib:
	$(CARGO) build --release --lib

$(BUILD)/quantize: examples/c/quantize.c include/lora.h lib
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -pedantic -Iinclude $< -o $@ \
	    -L$(LIBDIR) -llora -Wl,-rpath,$(abspath $(LIBDIR)) -lm

demo: $(BUILD)/quantize
	./$(BUILD)/quantize

test:
	$(CARGO) test

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
