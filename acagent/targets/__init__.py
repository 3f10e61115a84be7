"""The target boundary: what a task may reach, and how it is reached.

``policy`` (the target and upload policies, enforced on the connection
made), ``session`` (redirect hops checked, credentials stripped across
origins, no cookies shared between tasks), ``deadline`` (a response that
outlives its task is shut) and ``encodings`` (which content encodings can be
decoded here).
"""
