"""LoRA Training: dataset preparation and training (UI-free core + a thin Gradio tab)."""


def initialize(global_translations, model_manager, gestionnaire, global_config):
    from modules.lora_training.jobs import TrainingJobs
    from modules.lora_training.ui import LoraTrainingTab

    jobs = TrainingJobs(model_manager=model_manager, app_config=global_config)
    tab = LoraTrainingTab(jobs=jobs, model_manager=model_manager, gestionnaire=gestionnaire, config=global_config)
    if tab.queue is not None:
        from modules.lora_training.queue_kinds import TrainingKinds

        tab.queue.register(TrainingKinds(tab))
    return tab
