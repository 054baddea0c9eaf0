/* The C API the Zig package translates (build.zig: addTranslateC). */
#include <lora.h>
