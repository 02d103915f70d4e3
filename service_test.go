package main

import "testing"

func TestHandleEventEveryPair(t *testing.T) {
	type result struct {
		state  State
		action Action
	}
	// want[state][event]; every State × Event pair is listed.
	want := map[State]map[Event]result{
		Initializing: {
			ConfigLoaded:   {Starting, StartListener},
			ListenerReady:  {Initializing, NoAction},
			ShutdownSignal: {Stopped, Shutdown},
			Drained:        {Initializing, NoAction},
			DrainTimeout:   {Initializing, NoAction},
		},
		Starting: {
			ConfigLoaded:   {Starting, NoAction},
			ListenerReady:  {Running, NoAction},
			ShutdownSignal: {Stopped, Shutdown},
			Drained:        {Starting, NoAction},
			DrainTimeout:   {Starting, NoAction},
		},
		Running: {
			ConfigLoaded:   {Running, NoAction},
			ListenerReady:  {Running, NoAction},
			ShutdownSignal: {Draining, NoAction},
			Drained:        {Running, NoAction},
			DrainTimeout:   {Running, NoAction},
		},
		Draining: {
			ConfigLoaded:   {Draining, NoAction},
			ListenerReady:  {Draining, NoAction},
			ShutdownSignal: {Stopped, Shutdown},
			Drained:        {Stopped, Shutdown},
			DrainTimeout:   {Stopped, Shutdown},
		},
		Stopped: {
			ConfigLoaded:   {Stopped, NoAction},
			ListenerReady:  {Stopped, NoAction},
			ShutdownSignal: {Stopped, NoAction},
			Drained:        {Stopped, NoAction},
			DrainTimeout:   {Stopped, NoAction},
		},
	}
	states := []State{Initializing, Starting, Running, Draining, Stopped}
	events := []Event{ConfigLoaded, ListenerReady, ShutdownSignal, Drained, DrainTimeout}
	if len(states) != len(stateNames) || len(events) != len(eventNames) {
		t.Fatalf("table covers %d states and %d events; service.go defines %d and %d",
			len(states), len(events), len(stateNames), len(eventNames))
	}
	for _, s := range states {
		for _, e := range events {
			w, ok := want[s][e]
			if !ok {
				t.Fatalf("no expectation for %v + %v", s, e)
			}
			t.Run(s.String()+"+"+e.String(), func(t *testing.T) {
				gotState, gotAction := handleEvent(s, e)
				if gotState != w.state || gotAction != w.action {
					t.Errorf("handleEvent(%v, %v) = %v, %v; want %v, %v", s, e, gotState, gotAction, w.state, w.action)
				}
			})
		}
	}
}

func TestStateEventActionNames(t *testing.T) {
	tests := []struct {
		name string
		got  string
		want string
	}{
		{"state", Draining.String(), "Draining"},
		{"event", DrainTimeout.String(), "DrainTimeout"},
		{"action", Shutdown.String(), "Shutdown(0)"},
		{"unknown state", State(42).String(), "State(?)"},
		{"unknown event", Event(-1).String(), "Event(?)"},
		{"unknown action", Action(9).String(), "Action(?)"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: String() = %q; want %q", tt.name, tt.got, tt.want)
		}
	}
}
