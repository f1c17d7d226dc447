"""`make demo`: a tiny model and two MoLE adapters built in minutes, served by vLLM."""
