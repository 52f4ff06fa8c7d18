"""Stage 2, graph facts and selection: the captured :class:`~fxpeft.graph.program.Program`, the patterns that
find linear sites and attention ops in it (:mod:`.patterns`, :mod:`.sites`), target selection
(:mod:`.selectors`) and the sequence helpers virtual-token methods share (:mod:`.tokens`)."""
