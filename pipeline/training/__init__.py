"""The model and its training: the network and its heads (``model``, ``heads``), what it starts from
(``weights``, ``transfer``), the recipe (``recipe``), one fit (``fit``, ``probe`` for the frozen-feature
modes), cross-validation (``crossval``), resuming a killed run (``resume``) and the train stage's work
(``train``)."""
