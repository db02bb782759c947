"""Failed records kept by the service: the upstream forgets them three days after a
job ends, so they are copied into the store in the background and served from it."""
