from modules.lora_training.cli import main

raise SystemExit(main())
