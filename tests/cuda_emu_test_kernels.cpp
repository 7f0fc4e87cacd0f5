// Test-only kernel variants, compiled into the emulator's kernel translation unit after csrc/cuda/*.cu.
