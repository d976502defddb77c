"""What every step shares: the step contract (signature, result, missing-input error, metrics sinks) and
console progress."""
