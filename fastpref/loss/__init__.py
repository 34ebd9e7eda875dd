"""The loss room, everything ``import fastpref`` needs: ``api`` (public entry points) checks the
arguments with ``options`` and hands them to ``dispatch``, which runs ``reference`` (eager
PyTorch), ``triton`` or ``native`` (``csrc/``); the two fused backends share ``autograd``. It
imports only torch, triton and numpy."""
