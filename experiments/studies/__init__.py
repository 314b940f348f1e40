"""Studies that test published claims at small scale (issue 11); results in docs/results.md."""
