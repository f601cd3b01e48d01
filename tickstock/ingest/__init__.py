"""The producer's side: read Redis (pub/sub or streams), normalize, route into the history."""
