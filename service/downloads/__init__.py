"""Downloads: a query job's result, streamed into results storage and served from it.

``records``: counting a result's records as its bytes pass (pure); ``results``: the
results directory (written to a temporary name, renamed when whole); ``serving``: a
stored result as an HTTP response, with its ETag and byte ranges.
"""
