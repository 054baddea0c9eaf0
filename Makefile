# liblora: the README's two commands, and the install step.
#   make demo                   build liblora (release) and run the main demo (QLoRA fine-tune) on the CPU
#   make demo-swap              two adapters on one NF4 base, hot-swapped (examples/c/swap.c)
#   make test                   run every test (Rust, C under sanitizers, bindings, install)
#   make install PREFIX=/usr/local [DESTDIR=...]
#                               liblora.so.X.Y.Z (+ symlinks), liblora.a, include/lora.h,
#                               include/lora.hpp, lib/pkgconfig/lora.pc, lib/cmake/lora/
CARGO ?= cargo
CC ?= cc
BUILD := build
# Where cargo writes the release libraries (follows CARGO_TARGET_DIR).
LIBDIR ?= $(or $(CARGO_TARGET_DIR),target)/release

# Install locations (GNU names; override any of them).
PREFIX ?= /usr/local
prefix ?= $(abspath $(PREFIX))
libdir ?= $(prefix)/lib
includedir ?= $(prefix)/include
DESTDIR ?=
INSTALL ?= install
# LORA_NO_BUILD=1: install the liblora.so/liblora.a already in LIBDIR
# without running cargo (the tests install the build under test this way).
LORA_NO_BUILD ?=

# The version from Cargo.toml's [package] section; the SONAME carries the
# major (build.rs sets -Wl,-soname,liblora.so.$(VERSION_MAJOR)).
VERSION := $(shell awk -F'"' '/^\[/{p=($$0=="[package]")} p&&/^version *=/{print $$2; exit}' Cargo.toml)
VERSION_MAJOR := $(firstword $(subst ., ,$(VERSION)))
SONAME := liblora.so.$(VERSION_MAJOR)
# What a static link of liblora.a needs besides libc (rustc's
# --print native-static-libs for the x86_64/aarch64 linux-gnu targets).
STATIC_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl

.PHONY: all lib demo demo-quantize demo-swap test install uninstall clean

all: lib

lib:
	$(CARGO) build --release --lib

# The build tree's liblora.so carries the SONAME, so a program linked with
# it asks the loader for liblora.so.N: build.rs links that name next to it.
$(BUILD)/quantize: examples/c/quantize.c include/lora.h lib
	@mkdir -p $(BUILD)
	@test -e $(LIBDIR)/$(SONAME) || ln -sf liblora.so $(LIBDIR)/$(SONAME)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -pedantic -Iinclude $< -o $@ \
	    -L$(LIBDIR) -llora -Wl,-rpath,$(abspath $(LIBDIR)) -lm

$(BUILD)/finetune: examples/c/finetune.c include/lora.h lib
	@mkdir -p $(BUILD)
	@test -e $(LIBDIR)/$(SONAME) || ln -sf liblora.so $(LIBDIR)/$(SONAME)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -pedantic -Iinclude $< -o $@ \
	    -L$(LIBDIR) -llora -Wl,-rpath,$(abspath $(LIBDIR)) -lm

$(BUILD)/swap: examples/c/swap.c include/lora.h lib
	@mkdir -p $(BUILD)
	@test -e $(LIBDIR)/$(SONAME) || ln -sf liblora.so $(LIBDIR)/$(SONAME)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -pedantic -Iinclude $< -o $@ \
	    -L$(LIBDIR) -llora -Wl,-rpath,$(abspath $(LIBDIR)) -lm

# The main demo: QLoRA fine-tuning of the embedded default model
# (models/default) on data/finetune.txt; MODEL=dir picks another Hugging
# Face model directory, TEXT=file another text, DEVICE=n trains on CUDA
# device n (the CPU when there is none).
demo: $(BUILD)/finetune
	$(if $(DEVICE),LORA_DEMO_DEVICE=$(DEVICE) )./$(BUILD)/finetune $(or $(MODEL),models/default) $(or $(TEXT),data/finetune.txt)

# The NF4 quantization demo (quantize a 4096x4096 matrix, save, load).
demo-quantize: $(BUILD)/quantize
	./$(BUILD)/quantize

# Hot swap: two adapters trained briefly, saved, loaded onto one NF4 base.
demo-swap: $(BUILD)/swap
	./$(BUILD)/swap

test:
	$(CARGO) test

install: $(if $(LORA_NO_BUILD),,lib)
	@test -n "$(VERSION)" || { echo "cannot read the version from Cargo.toml" >&2; exit 1; }
	@test -f $(LIBDIR)/liblora.so || { echo "no $(LIBDIR)/liblora.so: run make lib (or set LIBDIR)" >&2; exit 1; }
	$(INSTALL) -d $(DESTDIR)$(libdir) $(DESTDIR)$(includedir) $(DESTDIR)$(libdir)/pkgconfig $(DESTDIR)$(libdir)/cmake/lora
	$(INSTALL) -m 755 $(LIBDIR)/liblora.so $(DESTDIR)$(libdir)/liblora.so.$(VERSION)
	ln -sf liblora.so.$(VERSION) $(DESTDIR)$(libdir)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(libdir)/liblora.so
	$(INSTALL) -m 644 $(LIBDIR)/liblora.a $(DESTDIR)$(libdir)/liblora.a
	$(INSTALL) -m 644 include/lora.h include/lora.hpp $(DESTDIR)$(includedir)/
	sed -e 's|@PREFIX@|$(prefix)|g' -e 's|@LIBDIR@|$(libdir)|g' -e 's|@INCLUDEDIR@|$(includedir)|g' \
	    -e 's|@VERSION@|$(VERSION)|g' -e 's|@STATIC_LIBS@|$(STATIC_LIBS)|g' \
	    cmake/lora.pc.in > $(DESTDIR)$(libdir)/pkgconfig/lora.pc
	sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@SONAME@|$(SONAME)|g' \
	    -e 's|@LIBDIR_FROM_CMAKEDIR@|$(shell realpath -m --relative-to=$(libdir)/cmake/lora $(libdir))|g' \
	    -e 's|@INCLUDEDIR_FROM_CMAKEDIR@|$(shell realpath -m --relative-to=$(libdir)/cmake/lora $(includedir))|g' \
	    cmake/loraConfig.cmake.in > $(DESTDIR)$(libdir)/cmake/lora/loraConfig.cmake
	sed -e 's|@VERSION@|$(VERSION)|g' cmake/loraConfigVersion.cmake.in > $(DESTDIR)$(libdir)/cmake/lora/loraConfigVersion.cmake

uninstall:
	rm -f $(DESTDIR)$(libdir)/liblora.so.$(VERSION) $(DESTDIR)$(libdir)/$(SONAME) $(DESTDIR)$(libdir)/liblora.so \
	    $(DESTDIR)$(libdir)/liblora.a $(DESTDIR)$(includedir)/lora.h $(DESTDIR)$(includedir)/lora.hpp \
	    $(DESTDIR)$(libdir)/pkgconfig/lora.pc $(DESTDIR)$(libdir)/cmake/lora/loraConfig.cmake \
	    $(DESTDIR)$(libdir)/cmake/lora/loraConfigVersion.cmake
	-rmdir $(DESTDIR)$(libdir)/cmake/lora 2>/dev/null

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
