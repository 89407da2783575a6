"""The fleet side of edgert: TUF repository, rollouts, controller, fleet state."""
