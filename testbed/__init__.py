"""DualPath testbed: an emulated PD-disaggregated LLM serving cluster on one Linux machine."""
