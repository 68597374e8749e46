"""The servers fanout is compared against, each started as its own process."""
