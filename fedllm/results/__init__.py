"""A run's results: its folder (:mod:`.writer`), comparisons of runs as tables and plots
(:mod:`.report`), experiment sets and the result cache (:mod:`.sweep`), optional trackers."""
