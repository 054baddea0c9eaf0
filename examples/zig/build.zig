//! The Zig example: `zig build run` (liblora found through pkg-config;
//! PKG_CONFIG_PATH=<prefix>/lib/pkgconfig for a non-default prefix).
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});
    const lora = b.dependency("lora", .{ .target = target, .optimize = optimize });

    const exe = b.addExecutable(.{
        .name = "quantize_lora",
        .root_module = b.createModule(.{
            .root_source_file = b.path("src/main.zig"),
            .target = target,
            .optimize = optimize,
            .imports = &.{.{ .name = "lora", .module = lora.module("lora") }},
        }),
    });
    b.installArtifact(exe);
    const run = b.addRunArtifact(exe);
    // The fine-tune reads models/default and data/finetune.txt from the
    // repository root (the installed binary takes MODEL_DIR TEXT).
    run.setCwd(b.path("../.."));
    b.step("run", "Run the example").dependOn(&run.step);
}
