"""The target boundary: what a task may reach, and how it is reached.

``policy`` (the target and upload policies, enforced on the connection
made) and ``session`` (redirect hops checked, credentials stripped across
origins, no cookies shared between tasks).
"""
