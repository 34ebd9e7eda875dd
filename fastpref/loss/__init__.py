"""The loss library: everything ``import fastpref`` needs (public API in ``api``, options and
checks in ``options``, eager math in ``reference``, backends behind ``dispatch``). It never
imports diffusers, peft or accelerate."""
