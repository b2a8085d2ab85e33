"""Where weights live: page-locked host copies and their budget, and the automatic placement choices."""
