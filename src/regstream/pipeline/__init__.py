"""The validation pipeline: stages (one function each) and the runner that sequences them."""
