"""The simulated producer (the embedded demo and tickstock-sim)."""
