"""One checker per method of tests/data/parity (see tests/test_parity.py for the contract)."""
