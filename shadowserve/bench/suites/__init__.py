"""The benchmark suites: one module per ``shadowserve bench SUITE``, each with ``add_arguments``
and ``run``; they print a table and, with ``--json FILE``, write the numbers they printed."""
