// Renders Ollama-style data through Go's own text/template, to cross-check render_go.
// stdin: JSON list of {"template", "system", "messages": [{"Role", "Content"}]} (already prepended/collated as Ollama does);
// stdout: JSON list of rendered strings (or "ERROR: ..." for a case Go rejects).
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

type message struct{ Role, Content string }

type tcase struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
}

func render(c tcase) string {
	t, err := template.New("").Option("missingkey=zero").Parse(c.Template)
	if err != nil {
		return "ERROR: " + err.Error()
	}
	msgs := make([]*message, len(c.Messages))
	for i := range c.Messages {
		msgs[i] = &c.Messages[i]
	}
	var b bytes.Buffer
	data := map[string]any{"System": c.System, "Messages": msgs, "Tools": nil, "Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false}
	if err := t.Execute(&b, data); err != nil {
		return "ERROR: " + err.Error()
	}
	return b.String()
}

func main() {
	var cases []tcase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]string, len(cases))
	for i, c := range cases {
		out[i] = render(c)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
