package main

import (
	"fmt"
	"image/color"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// plotShaped draws the shaped scenarios' runs as bars of fraction_of_limit
// (one group per scenario, one bar per run) with the targets, to a PNG.
func plotShaped(path string, ss []Scenario) error {
	if len(ss) == 0 {
		return nil
	}
	p := plot.New()
	p.Title.Text = "Pull time against the physical limit (shaped links)"
	p.Y.Label.Text = "fraction of the limit (limit s ÷ time s)"
	p.Y.Min, p.Y.Max = 0, 1
	labels := []string{"traditional", "first", "stripe"}
	colors := []color.Color{color.RGBA{150, 150, 150, 255}, color.RGBA{90, 140, 210, 255}, color.RGBA{40, 170, 90, 255}}
	w := vg.Points(18)
	for i, label := range labels {
		var vals plotter.Values
		for _, s := range ss {
			v := 0.0
			for _, r := range s.Runs {
				if r.Label == label {
					v = r.FractionOfLimit
				}
			}
			vals = append(vals, v)
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = colors[i]
		bars.LineStyle.Width = 0
		bars.Offset = vg.Length(i-1) * w
		p.Add(bars)
		p.Legend.Add(label, bars)
	}
	var names []string
	for _, s := range ss {
		names = append(names, fmt.Sprintf("%s (limit %.1f s, target %.2f)", s.Name, s.LimitSeconds, s.Target))
	}
	p.NominalX(names...)
	p.Legend.Top = true
	return p.Save(7*vg.Inch, 4*vg.Inch, path)
}
