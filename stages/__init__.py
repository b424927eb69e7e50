"""fashion-mixer: the DVC stages of the pipeline and the library code they share."""
