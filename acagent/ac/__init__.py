"""The AC link: every request to the AC server and its upload storage.

``client`` (``ACClient``, the endpoints), ``multipart`` (the streamed upload body),
``transport`` (one AC request on the urllib3 pool) and ``abandon`` (a long
poll shut at stop), ``permits`` (at most two AC requests in flight, local or
shared through Redis), ``ratelimit`` (token buckets), ``retry`` and
``backoff`` (the schedules), ``breaker`` (a class of calls that pauses) and
``scripts`` (the Redis scripts of the shared permits and rate budget, as
``.lua`` files beside it).
"""
