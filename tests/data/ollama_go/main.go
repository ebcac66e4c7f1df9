// Executes Ollama TEMPLATEs the way Ollama does, for localmed's tests: Go's text/template with
// missingkey=zero and Ollama's "json" function, over Ollama's data. Before the template runs, the
// request's messages get what Ollama's chat handler and template.Execute give them: the
// Modelfile's SYSTEM prepended when the request has no system message first, system contents
// joined into .System, consecutive messages of one role merged with a blank line.
//
// stdin: a JSON list of {"template", "modelfile_system", "messages": [{"role", "content"}]};
// stdout: a JSON list of {"text"} or {"error"}.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template        string    `json:"template"`
	ModelfileSystem string    `json:"modelfile_system"`
	Messages        []Message `json:"messages"`
}

type Result struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

func run(c Case) Result {
	msgs := c.Messages
	if c.ModelfileSystem != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.ModelfileSystem}}, msgs...)
	}
	var system []string
	var collated []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	funcs := template.FuncMap{"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	}}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return Result{Error: err.Error()}
	}
	var b strings.Builder
	err = t.Execute(&b, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": nil,
		"Response": "", "Think": false, "IsThinkSet": false,
	})
	if err != nil {
		return Result{Error: err.Error()}
	}
	return Result{Text: b.String()}
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	results := make([]Result, len(cases))
	for i, c := range cases {
		results[i] = run(c)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
