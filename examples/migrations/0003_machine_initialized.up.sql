-- A provided machine is initialized once its agent is installed
-- (examples/initializer.lua): the agent's version and what the install
-- printed.
CREATE TABLE machine_initialized (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    agent_version TEXT NOT NULL,
    output TEXT NOT NULL,
    initialized_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
