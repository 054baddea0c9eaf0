//! The Zig package of liblora: module "lora" (src/lora.zig) over the C
//! header, translated by the build system (Zig 0.16+ has no @cImport; the
//! translate-c step is its replacement), linked against liblora.
//!
//! Finding liblora: pkg-config's lora.pc (`make install` writes it; set
//! PKG_CONFIG_PATH for a non-default prefix), or explicit directories:
//!   zig build test -Dlora-include=<prefix>/include -Dlora-lib=<prefix>/lib
//! With -Dlora-lib the tests get an rpath to it.
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});
    const include_dir = b.option([]const u8, "lora-include", "directory holding lora.h (default: pkg-config lora)");
    const lib_dir = b.option([]const u8, "lora-lib", "directory holding liblora.so (default: pkg-config lora, then the system's paths)");

    const tc = b.addTranslateC(.{
        .root_source_file = b.path("src/c.h"),
        .target = target,
        .optimize = optimize,
    });
    if (include_dir) |d| tc.addIncludePath(.{ .cwd_relative = d });
    tc.linkSystemLibrary("lora", .{});

    const mod = b.addModule("lora", .{
        .root_source_file = b.path("src/lora.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .imports = &.{.{ .name = "c", .module = tc.createModule() }},
    });
    mod.linkSystemLibrary("lora", .{});
    if (lib_dir) |d| {
        mod.addLibraryPath(.{ .cwd_relative = d });
        mod.addRPath(.{ .cwd_relative = d });
    }

    const tests = b.addTest(.{ .root_module = b.createModule(.{
        .root_source_file = b.path("src/lora_test.zig"),
        .target = target,
        .optimize = optimize,
        .imports = &.{.{ .name = "lora", .module = mod }},
    }) });
    const run_tests = b.addRunArtifact(tests);
    // The model tests read models/default and data/finetune.txt.
    run_tests.setCwd(b.path("../.."));
    const test_step = b.step("test", "Run the binding's tests against liblora");
    test_step.dependOn(&run_tests.step);
}
