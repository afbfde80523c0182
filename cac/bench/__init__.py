"""Table 6: inference speed and memory, baseline vs +CAC (``task: benchmark`` specs)."""
