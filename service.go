package main

// The life of the process, as a pure state machine:
//
//	Initializing + ConfigLoaded   → Starting (StartListener)
//	Starting     + ListenerReady  → Running
//	Running      + ShutdownSignal → Draining
//	Draining     + DrainTimeout   → Stopped  (Shutdown(0))
//	Draining     + Drained        → Stopped  (Shutdown(0))
//	any other    + ShutdownSignal → Stopped  (Shutdown(0))
//	Stopped      + anything       → Stopped
//
// Every other pair leaves the state as it is and asks for nothing. main.go
// turns config loading, the listener, signals and the drain timer into events
// and carries out the actions; handleEvent itself does no I/O.

// State is where the process is in its life.
type State int

const (
	// Initializing is the first state: the config is being loaded.
	// Next: Starting (ConfigLoaded) or Stopped (ShutdownSignal).
	Initializing State = iota
	// Starting: the config is valid and the listener is being bound.
	// Next: Running (ListenerReady) or Stopped (ShutdownSignal).
	Starting
	// Running: proxying requests. Next: Draining (ShutdownSignal).
	Running
	// Draining: no new connections; in-flight requests may finish.
	// Next: Stopped (Drained, DrainTimeout or a second ShutdownSignal).
	Draining
	// Stopped is terminal.
	Stopped
)

var stateNames = [...]string{"Initializing", "Starting", "Running", "Draining", "Stopped"}

func (s State) String() string {
	if s < 0 || int(s) >= len(stateNames) {
		return "State(?)"
	}
	return stateNames[s]
}

// Event is something that happened to the process.
type Event int

const (
	// ConfigLoaded: the config file was read and validated.
	ConfigLoaded Event = iota
	// ListenerReady: the listen address is bound and serving.
	ListenerReady
	// ShutdownSignal: SIGTERM or SIGINT arrived.
	ShutdownSignal
	// Drained: every in-flight request finished.
	Drained
	// DrainTimeout: the drain period ran out with requests still open.
	DrainTimeout
)

var eventNames = [...]string{"ConfigLoaded", "ListenerReady", "ShutdownSignal", "Drained", "DrainTimeout"}

func (e Event) String() string {
	if e < 0 || int(e) >= len(eventNames) {
		return "Event(?)"
	}
	return eventNames[e]
}

// Action is what the caller of handleEvent must do next.
type Action int

const (
	// NoAction: nothing to do.
	NoAction Action = iota
	// StartListener: bind the listen address and start serving.
	StartListener
	// Shutdown: close everything still open and exit with status 0.
	Shutdown
)

var actionNames = [...]string{"None", "StartListener", "Shutdown(0)"}

func (a Action) String() string {
	if a < 0 || int(a) >= len(actionNames) {
		return "Action(?)"
	}
	return actionNames[a]
}

// handleEvent returns the state that follows s on e and the action to take.
func handleEvent(s State, e Event) (State, Action) {
	switch {
	case s == Stopped:
		return Stopped, NoAction
	case s == Initializing && e == ConfigLoaded:
		return Starting, StartListener
	case s == Starting && e == ListenerReady:
		return Running, NoAction
	case s == Running && e == ShutdownSignal:
		return Draining, NoAction
	case s == Draining && (e == Drained || e == DrainTimeout):
		return Stopped, Shutdown
	case e == ShutdownSignal:
		return Stopped, Shutdown
	}
	return s, NoAction
}
