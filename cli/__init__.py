"""The ``tailledger`` command line: the top floor, where the other packages are put together.

Role in the pipeline
--------------------
Every other package is a library; this one turns them into programs.  It reads the
configuration, composes the event log, the projections, the control server and the
relay into a running server, and gives the operator commands that act on that server
(through its local admin socket) or on the log directly (read-only).  It may import
every other package; none imports it.

Inside, imports point one way too (``tests/cli/test_import_cycles.py``): the
configuration (:mod:`cli.config`), its settings (:mod:`cli.settings`), the web routes
(:mod:`cli.web`, :mod:`cli.register_web`, :mod:`cli.api` …) and the network services
(:mod:`cli.network`) below :mod:`cli.server`, which composes them once into a frozen
:class:`~cli.server.Services`; the command modules below :mod:`cli.main`.

Commands (``tailledger --help``; parsing in :mod:`cli.main`)::

    serve            run the control server            server.py, network.py, web.py,
                                                       settings.py, config.py, adminsock.py,
                                                       api/, audit.py, policyfile.py, gcpolicy.py
    relay            run the DERP relay + STUN alone   relaycmd.py, settings.py (relay.serve)
    config check     validate the configuration        config.py
    users            manage users                      main.py -> admin socket
    apikeys          API keys of the admin HTTP API    apikeycmd.py -> admin socket
    oauth-clients    OAuth clients of /api/v2          apikeycmd.py -> admin socket
    preauthkeys      manage pre-auth keys              main.py -> admin socket
    nodes            list, rename, tag, expire, approve routes, pending registrations
                                                       main.py -> admin socket
    log              show, tail, verify, pubkey, anchor, checkpoint
                                                       logcmd.py, audit.py
    policy           get, set, check, evaluate         main.py, policy_evaluate.py
    replay           the past from the log (state, netmap, diff, reach, who-can-reach)
                                                       replaycmd.py, timeline_svg.py
    bench            log, relay, policy, replay, api, conn-memory, hub
                                                       bench/ (bench/scenarios.py)
    loadgen          N simulated clients over the real protocol
                                                       bench/loadgen/, bench/scenarios.py

Shared pieces: :mod:`cli.cmdline` (what every command module uses: the user-facing
error, the command's configuration, admin socket calls, ``-o`` output),
:mod:`cli.output` (tables or JSON, with node-written text escaped),
:mod:`cli.durations` (``90s``, ``7d``...; the configuration's are parsed once, into
:attr:`cli.config.Config.durations`), :mod:`cli.settings` (the configuration turned
into each service's settings), :mod:`cli.adminsock` (the admin socket
the administrative commands talk to; its operations are
:class:`projections.admin.AdminOps`, the same ones the admin HTTP API in
:mod:`cli.api` runs), :mod:`cli.spawn` (starts ``tailledger serve`` children, through
the console script and on this checkout's code, for the load generator, the
benchmarks and the tests).

Running ``python -m cli`` is the same as the ``tailledger`` console script.
"""
