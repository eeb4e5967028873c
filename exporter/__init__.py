"""Training, export and evaluation; heavy imports (torch, ultralytics) only inside functions."""
