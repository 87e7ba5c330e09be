"""The page's tabs, one module each: its components (`build`) and its handlers, functions of
the runs folder and the controls. `ui/app.py` lays them out and wires their events."""
