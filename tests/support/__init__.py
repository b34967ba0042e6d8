"""Helpers shared by more than one test package.

A helper that only one package uses stays in that package; once a second package
imports it, it moves here, so test packages never import each other.

* :mod:`tests.support.builders` -- :class:`Recorder` (real commands into a real
  in-memory log) and :class:`RandomHistory`, the one random-history builder (fold,
  replay, policy and map-hub tests), for projection, replay, abuse and benchmark tests.
* :mod:`tests.support.netmap_model` -- :class:`ClientNetmap`, a model of how a
  Tailscale client applies map responses, for the map-stream tests of protocol and
  projections.
* :mod:`tests.support.relay_helpers` -- sans-I/O relay logins, running relays, waits
  for relay events (relay tests and the DERP-on-the-control-port test).
* :mod:`tests.support.waits` -- polling a condition with a deadline, for what has
  nothing to wait on (another process, a worker thread); its docstring says when to
  use trio's virtual clock or ``wait_all_tasks_blocked`` instead.
* :mod:`tests.support.accounts` -- running the CLI as another Unix account (cli and
  e2e audit tests).
* :mod:`tests.support.ledger` -- reading a server's log read-only from the outside
  (the CLI and API tests).
* :mod:`tests.support.net` -- waiting for another process's port, reading a
  connection to its end.
"""
