"""Node tooling: install, init or join, invite, start, stop, and throwaway local
clusters. None of it runs inside the agent."""
