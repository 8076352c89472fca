"""Pure tensor transforms: no names, no files; the same bits on CPU and GPU."""
