"""The ground floor: what an event, a topic and a seam are. Imports nothing else of TickStock."""
