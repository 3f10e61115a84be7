"""The command line: ``acagent run``, ``acagent check``, ``acagent demo``.

``main`` dispatches the subcommands and runs the agent; ``options`` turns
flags and environment into an ``AgentConfig``; ``check``, ``demo`` and
``demo_multi`` are the other subcommands.
"""
