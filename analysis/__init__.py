"""vitq's analyses: metrics, sensitivity and error analyzers, mixed-precision planner."""
