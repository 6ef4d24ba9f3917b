"""The pcocc command line: parsing and rendering only; the work is in the core."""
