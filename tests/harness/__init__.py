"""Test harness: a real ComfyUI host in-process, as a server, and in a browser."""
