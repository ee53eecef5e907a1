"""The control protocol shared by the server and the operator console (pure, no runtime)."""
