"""What a run minimises: losses (:mod:`.losses`) on their parametrisations (:mod:`.parametrisation`: ε, v, x0, flow),
distillations around them (:mod:`.distillation`: the base class and LiT's hybrid one; :mod:`.consistency`: LCM), and
the one function that builds a config's objective (:mod:`.build`)."""
