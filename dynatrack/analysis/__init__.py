"""Pure analysis functions: numpy / torch arrays in, arrays or small tables out (no I/O, no Ray)."""
