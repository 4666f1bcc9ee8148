package main

import (
	"fmt"
	"image/color"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// shapedOrder is the order of the shaped runs in the plot; labels not in it
// follow, in the order they first appear.
// (The -tls runs come last, so that the others keep their colours.)
var shapedOrder = []string{"traditional", "first", "stripe", "claim-stripe", "observer-stripe",
	"stripe-tls", "claim-stripe-tls", "observer-stripe-tls"}

// shapedColors are the bar colours of shapedOrder's labels, then of the
// others in turn.
var shapedColors = []color.Color{
	color.RGBA{150, 150, 150, 255}, // traditional: grey
	color.RGBA{90, 140, 210, 255},  // first: blue
	color.RGBA{40, 170, 90, 255},   // stripe: green
	color.RGBA{230, 130, 30, 255},  // claim-stripe: orange
	color.RGBA{150, 80, 180, 255},  // observer-stripe: purple
	color.RGBA{200, 60, 60, 255},
	color.RGBA{60, 180, 190, 255},
	color.RGBA{180, 160, 40, 255},
	color.RGBA{120, 90, 60, 255},
}

// runLabels returns every run label of ss: shapedOrder's first, then the
// others in the order they first appear.
func runLabels(ss []Scenario) []string {
	seen := map[string]bool{}
	var others []string
	for _, s := range ss {
		for _, r := range s.Runs {
			if !seen[r.Label] && !slices.Contains(shapedOrder, r.Label) {
				others = append(others, r.Label)
			}
			seen[r.Label] = true
		}
	}
	var labels []string
	for _, l := range shapedOrder {
		if seen[l] {
			labels = append(labels, l)
		}
	}
	return append(labels, others...)
}

// plotShaped draws the shaped scenarios' runs as bars of fraction_of_limit
// (one group per scenario, one bar per run label that appears in any of
// them, side by side) with each scenario's target as a dashed line, to a
// PNG. A run a scenario lacks leaves a gap in its group.
func plotShaped(path string, ss []Scenario) error {
	if len(ss) == 0 {
		return nil
	}
	labels := runLabels(ss)
	if len(labels) == 0 {
		return nil
	}
	p := plot.New()
	p.Title.Text = "Pull time against the physical limit (shaped links)"
	p.Y.Label.Text = "fraction of the limit (limit s ÷ time s)"
	p.Y.Min, p.Y.Max = 0, 1
	// One group per scenario, one nominal X unit apart; the groups' bars
	// fill at most 70% of a unit so that groups never touch. The bar width
	// is in points, so the canvas grows with the number of bars.
	const barPt, groupFill = 16, 0.7
	w := vg.Points(barPt)
	groupPt := float64(len(labels)) * barPt / groupFill
	// Room on the right of the last group for the legend.
	legendUnits := 1.0
	width := vg.Points(max(504, 90+groupPt*(float64(len(ss))+legendUnits)))
	// The targets first, so that the bars and their values draw over them.
	var names []string
	var target *plotter.Line // for the legend, after the runs
	for g, s := range ss {
		names = append(names, fmt.Sprintf("%s (limit %.1f s, target %.2f)", s.Name, s.LimitSeconds, s.Target))
		if s.Target <= 0 {
			continue
		}
		half := groupFill / 2
		line, err := plotter.NewLine(plotter.XYs{{X: float64(g) - half, Y: s.Target}, {X: float64(g) + half, Y: s.Target}})
		if err != nil {
			return err
		}
		line.Color = color.RGBA{160, 30, 30, 255}
		line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(line)
		target = line
	}
	for i, label := range labels {
		var vals plotter.Values
		var pts plotter.XYs
		var texts []string
		for g, s := range ss {
			v := 0.0
			for _, r := range s.Runs {
				if r.Label == label {
					v = r.FractionOfLimit
				}
			}
			vals = append(vals, v)
			if v > 0 {
				pts = append(pts, plotter.XY{X: float64(g), Y: v})
				texts = append(texts, fmt.Sprintf("%.2f", v))
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.Color = shapedColors[i%len(shapedColors)]
		bars.LineStyle.Width = 0
		bars.Offset = vg.Length(float64(i)-float64(len(labels)-1)/2) * w
		p.Add(bars)
		p.Legend.Add(label, bars)
		if err := addBarLabels(p, bars, pts, texts); err != nil {
			return err
		}
	}
	if target != nil {
		p.Legend.Add("target", target)
	}
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.5, float64(len(ss))-0.5+legendUnits
	p.Legend.Top = true
	return p.Save(width, 4*vg.Inch, path)
}

// addBarLabels writes texts above bars at pts, in small type; none when
// pts is empty.
func addBarLabels(p *plot.Plot, bars *plotter.BarChart, pts plotter.XYs, texts []string) error {
	if len(pts) == 0 {
		return nil
	}
	vl, err := plotter.NewLabels(plotter.XYLabels{XYs: pts, Labels: texts})
	if err != nil {
		return err
	}
	for k := range vl.TextStyle {
		vl.TextStyle[k].Font.Size = vg.Points(7)
		vl.TextStyle[k].XAlign = draw.XCenter
	}
	vl.Offset = vg.Point{X: bars.Offset, Y: vg.Points(2)}
	p.Add(vl)
	return nil
}
