"""Agent programs that run inside the emulated hosts."""
